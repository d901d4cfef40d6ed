"""Everything that speaks HTTP: the session, timeouts, one POST, and what its answer means.

With ``_client`` (which owns the session's lifecycle) the only module that
knows aiohttp. Which statuses prove "not processed" is ``_delivery``'s table;
this module turns each answer into a ``SendResult`` or the error that table
names, and every aiohttp exception into a ``BotMessageError``.
"""

from __future__ import annotations

import asyncio
import codecs
import email.utils
import functools
import io
import math
import select
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from ssl import SSLContext
from typing import Any, Final

import aiohttp
from aiohttp.client_proto import ResponseHandler
from attrs import define, evolve
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import _wire
from ._delivery import StatusRule, status_rule
from ._errors import (
    APIStatusError,
    AuthenticationError,
    BotMessageError,
    CertificateError,
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
from ._models import NO_HEADERS, ResponseHeaders, SendResult, Status

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "TRANSPORT_ERRORS",
    "AnswerRules",
    "Secret",
    "SessionOptions",
    "attempt_timeout",
    "bounded_timeout",
    "kept_headers",
    "merged_headers",
    "new_session",
    "open_post",
    "parse_retry_after",
    "raised_while_connecting",
    "read_answer",
    "send_url",
    "session_loop",
    "transport_error",
]

#: Largest answer body read, in bytes (after inflating a compressed one).
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024


@define(frozen=True)
class AnswerRules:
    """How one client reads answers: its size cap, its policy's statuses and FAILURE rule."""

    max_response_bytes: int
    not_processed: frozenset[int]
    classify: Callable[[SendResult], bool]


def send_url(base_url: URL, base_path: str, dept: str, user: str) -> URL:
    """The endpoint for one message.

    ``base_path`` is ``base_url``'s raw path without a trailing slash (worked out
    once per client); ``dept`` and ``user`` are already percent-encoded.
    """
    path = f"{base_path}/communications/department/{dept}/user/{user}/botmessage/send"
    return base_url.with_path(path, encoded=True)


def attempt_timeout(
    option: float | aiohttp.ClientTimeout | None, total: float, connect: float
) -> aiohttp.ClientTimeout:
    """The per-attempt timeout: the client's ``timeout=`` option, or the policy's figures.

    aiohttp runs no timer for a timeout of 0 or less (or NaN): a ``ClientTimeout``
    total like that counts as none (each attempt is then bounded by the deadline),
    and a number like that is refused.

    Raises:
        InvalidRequestError: ``option`` is a number that is not > 0, or not a number.
    """
    if isinstance(option, aiohttp.ClientTimeout):
        if option.total is not None and not option.total > 0:
            option = evolve(option, total=None)
        return option if option.total is None else bounded_timeout(option, option.total)
    if option is not None and (
        isinstance(option, bool) or not isinstance(option, int | float) or not option > 0
    ):
        raise InvalidRequestError(
            "timeout", option, "must be seconds > 0, an aiohttp.ClientTimeout, or None"
        )
    total = total if option is None else option
    return bounded_timeout(aiohttp.ClientTimeout(total=total, connect=connect), total)


@define(frozen=True)
class SessionOptions:
    """How the client's own session connects: its pool, TLS, proxy and tracing.

    Each of these belongs to an ``aiohttp.ClientSession`` (or its connector): a
    client lent a session by its caller cannot apply them, so it refuses them
    (``changed()`` names those set) rather than ignore them.
    """

    max_connections: int | None = None
    keepalive_timeout: float = 4.0
    #: True: verify with the default trust store; False: do not verify; or a context.
    ssl: SSLContext | bool = True
    #: The proxy's URL, without credentials (the client sends those itself).
    proxy: URL | None = None
    trust_env: bool = False
    trace_configs: tuple[aiohttp.TraceConfig, ...] = ()

    def changed(self) -> list[str]:
        """The options set to other than their default, by argument name."""
        default = SessionOptions()
        names = ("max_connections", "keepalive_timeout", "ssl", "proxy", "trust_env")
        changed = [name for name in names if getattr(self, name) != getattr(default, name)]
        if self.trace_configs:
            changed.append("trace_configs")
        return changed


def new_session(options: SessionOptions, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A session over a pool that never lends a connection the server already closed."""
    connector = _LiveConnector(
        limit=options.max_connections or 0,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=options.keepalive_timeout,
        ssl=options.ssl,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Cookies play no part in this API; skipping them saves work per answer.
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=timeout,
        proxy=options.proxy,
        trust_env=options.trust_env,
        trace_configs=list(options.trace_configs) or None,
    )


def session_loop(session: aiohttp.ClientSession) -> asyncio.AbstractEventLoop | None:
    """The event loop a session was made on (its connector, timers and pool live there).

    aiohttp's accessors for it (``ClientSession.loop``, ``Connection.loop``) are
    deprecated and warn on every read, so this reads the attribute behind them, the
    one aiohttp itself compares (``connector._loop is not loop``) when it builds a
    session. Read once per client, when it binds to a loop: never per send.

    Returns:
        The loop, or ``None`` if this aiohttp does not keep one where expected (the
        check is then skipped; ``tests/test_misuse.py`` pins the attribute).
    """
    loop = getattr(session, "_loop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


#: What aiohttp raises for a failed exchange; ``transport_error`` says what each one means.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)


#: The largest body aiohttp sends from ``bytes`` without a ResourceWarning (its
#: ``payload.TOO_LARGE_BYTES_BODY``, 1 MiB); a text of 1 MiB is up to 6 MiB escaped.
_LARGE_BODY: Final = 2**20


def open_post(
    session: aiohttp.ClientSession,
    url: URL,
    body: bytes,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
    proxy_headers: dict[str, str] | None = None,
) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
    """Start one attempt: the POST, as aiohttp's ``async with`` context (no redirects followed).

    Used as ``async with open_post(...) as response: await read_answer(response, rules)``
    inside ``except TRANSPORT_ERRORS as exc: raise transport_error(exc, url)``: the
    caller's own coroutine awaits aiohttp directly, one frame less on every wake-up of
    every send than a wrapping coroutine would cost. ``proxy_headers`` go to the
    session's proxy only (on its ``CONNECT``).

    A session lent by the caller may be set to raise for an error status or to
    leave bodies compressed: ``read_answer`` must see every status and the JSON
    itself (a raised 429 would read as a lost answer), so each request says so.
    """
    return session.post(
        url,
        # aiohttp warns (ResourceWarning) for raw bytes over 1 MiB, an error where
        # warnings are: such a body goes as a stream, one per attempt (read once).
        data=body if len(body) <= _LARGE_BODY else io.BytesIO(body),
        headers=headers,
        timeout=timeout,
        allow_redirects=False,
        proxy_headers=proxy_headers,
        raise_for_status=False,
        auto_decompress=True,
    )


def transport_error(exc: BaseException, url: URL) -> BotMessageError:
    """The ``BotMessageError`` an aiohttp failure of one attempt stands for.

    Nothing sent (no connection, a certificate refused, a pooled connection that
    was closed before the request was written) is a ``TransportError``; anything
    after the request may have been written is a ``ResponseLostError`` (unknown).
    """
    # First: the caller chains ``exc``, and a refused proxy tunnel
    # (``ClientHttpProxyError``) carries the CONNECT's Proxy-Authorization too.
    _scrub(exc)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return CertificateError(
            f"TLS verification of {url.host} failed: {_tls_reason(exc)}; "
            "the server's certificate is not trusted. Nothing was sent; not retried",
        )
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        # Checked right after the TLS handshake, before the request is written.
        return CertificateError(
            f"the certificate of {url.host} does not match the fingerprint the session "
            "pins. Nothing was sent; not retried",
        )
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return TransportError(
            f"could not connect to the proxy {exc.host}:{exc.port}: "
            f"{exc.os_error.__class__.__name__}; nothing was sent, check the proxy",
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        # The proxy refused the tunnel (CONNECT): nothing reached the service.
        return TransportError(
            f"the proxy refused to connect to {url.host} (HTTP {exc.status}); "
            "nothing was sent, check the proxy and its credentials",
        )
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return TransportError(
            f"could not connect to {url.host}: {exc.__class__.__name__}; "
            "nothing was sent, check the host and the network",
        )
    if _closed_before_written(exc):
        # A stale pooled connection: safe to retry, on another connection
        # (aiohttp drops this one).
        return TransportError(
            "the pooled connection was closed before the request was written; nothing was sent",
        )
    if raised_while_connecting(exc):
        return TransportError(
            f"no connection to {url.host} was made ({exc.__class__.__name__}); nothing was sent",
        )
    return ResponseLostError(
        f"the request was sent but no answer came back ({exc.__class__.__name__}); "
        "the message may or may not have been delivered",
    )


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
    # An int too large for a float is no bound, as inf is (float arithmetic, and
    # math.isfinite, would raise OverflowError on it).
    total = _seconds(total)
    if timeout.connect is not None and _seconds(timeout.connect) != timeout.connect:
        timeout = evolve(timeout, connect=_seconds(timeout.connect))
    if not math.isfinite(total):
        # No bound at all (deadline=inf): aiohttp's None, since it rounds a timer's
        # instant with math.ceil, which cannot take an infinite one.
        connect = timeout.connect
        if connect is not None and not math.isfinite(connect):
            connect = None
        if timeout.total is None and timeout.connect == connect:
            return timeout
        return evolve(timeout, total=None, connect=connect)
    # A connect timeout of 0 or less (or NaN) is none to aiohttp: the total's then.
    given = timeout.connect
    connect = min(given if given is not None and given > 0 else total, total * 0.9)
    ceil_threshold = max(timeout.ceil_threshold, total + 1.0)
    if (
        timeout.total == total
        and timeout.connect == connect
        and timeout.ceil_threshold == ceil_threshold
    ):
        return timeout
    return evolve(timeout, total=total, connect=connect, ceil_threshold=ceil_threshold)


def _seconds(value: float) -> float:
    """``value`` as a float; an int too large for one is infinite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


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


def raised_while_connecting(exc: BaseException) -> bool:
    """Whether aiohttp raised ``exc`` inside its connector's ``connect``.

    The request is written only once ``connect`` has returned a connection, so
    any failure raised within it (the session closed under a connection being
    made, a check of a new connection) proves that nothing reached the service.
    Like ``_closed_before_written``, this reads the traceback; on an aiohttp
    whose frames differ nothing matches, and the failure stays ambiguous.
    """
    for error in (exc, exc.__cause__):
        tb = error.__traceback__ if error is not None else None
        while tb is not None:
            frame = tb.tb_frame
            if (
                frame.f_code.co_name == "connect"
                and frame.f_globals.get("__name__") == "aiohttp.connector"
            ):
                return True
            tb = tb.tb_next
    return False


#: Bytes asked for per read of an answer (asyncio's transport; see ``_LiveHandler``).
_READ_SIZE = 64 * 1024


#: Whether this platform has ``select.poll`` (Windows has not).
_HAS_POLL: Final = hasattr(select, "poll")


class _LiveHandler(ResponseHandler):
    """aiohttp's response protocol, which also calls a connection the server spoke on dead.

    aiohttp reuses a pooled connection when its protocol ``is_connected()``: the
    event loop has not seen it close. A server's FIN that is in the kernel but not
    yet read by the loop (it answered and closed at once, or its idle timeout just
    ran out) would carry the next request to a dead socket, and the send would end
    "unknown". An idle keep-alive connection has nothing to read unless the server
    closed it (FIN or RST) or sent something unasked (a 408, a TLS close_notify):
    either way it must not carry a request. The check is one ``poll`` with no
    wait (``select`` where there is no ``poll``), made where aiohttp takes a
    connection from its pool (and in its periodic sweep of the pool), so it costs
    no coroutine of its own; aiohttp then closes the connection and takes another.
    """

    #: The socket's descriptor, kept from ``connection_made`` (-1: none to check).
    _fd = -1
    #: A poll object watching ``_fd`` alone, built once per connection: asking it
    #: costs half a ``select`` of the same descriptor (0.43 vs 0.82 us, measured).
    _poller: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if isinstance(getattr(transport, "max_size", None), int):
            # asyncio's own transport reads with recv(max_size), 256 KiB: a buffer
            # that large is above glibc's mmap threshold, so every read of a
            # 300-byte answer maps and unmaps it (seen with strace). 64 KiB (what
            # aiohttp reads a body by) comes from the heap. This connection only;
            # uvloop has no such attribute and reads into a buffer of its own.
            transport.max_size = _READ_SIZE  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        try:
            self._fd = sock.fileno() if sock is not None else -1
        except (OSError, ValueError):
            self._fd = -1
        if self._fd >= 0 and _HAS_POLL:
            poller = select.poll()
            # POLLIN alone: poll adds POLLHUP, POLLERR and POLLNVAL by itself, which
            # is what select calls readable (or refuses, for a closed descriptor).
            # Not POLLPRI: TCP urgent data is no part of the HTTP stream, and select
            # never counted it. Unlike select, any descriptor number (>= 1024 too).
            poller.register(self._fd, select.POLLIN)
            self._poller = poller

    def is_connected(self) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        # The descriptor is the connection's own while its transport is not closing:
        # asyncio closes the socket only after that.
        fd = self._fd
        if fd < 0:
            return True
        poller = self._poller
        try:
            if poller is not None:
                # Any event (data, EOF, an error, a hang-up) means the server spoke.
                return not poller.poll(0)
            readable, _, _ = select.select((fd,), (), (), 0)
        except (OSError, ValueError):
            return False
        return not readable


class _LiveConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that never lends a pooled connection the server already closed.

    Its connections use ``_LiveHandler``, whose ``is_connected()`` is what aiohttp's
    pool asks before it reuses one.
    """

    def __init__(
        self,
        *,
        limit: int,
        limit_per_host: int,
        ttl_dns_cache: int,
        keepalive_timeout: float,
        ssl: SSLContext | bool,
    ) -> None:
        super().__init__(
            limit=limit,
            limit_per_host=limit_per_host,
            ttl_dns_cache=ttl_dns_cache,
            keepalive_timeout=keepalive_timeout,
            ssl=ssl,
        )
        # aiohttp makes every connection's protocol with this factory (3.9 to 3.14);
        # tests/reliability/test_stale_connections.py fails if a later aiohttp stops
        # calling it (attempts are then spent on closed connections again).
        self._factory = functools.partial(_LiveHandler, loop=self._loop)  # type: ignore[assignment]


def _tls_reason(exc: aiohttp.ClientConnectorCertificateError) -> str:
    """Why the certificate was refused, in OpenSSL's words (e.g. "self-signed certificate")."""
    cause = exc.certificate_error
    reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
    return str(reason or cause.__class__.__name__)


def merged_headers(base: dict[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ``extra`` added: an extra header replaces a base one of the same
    name in any case (never both sent), and its value is shown ``'<redacted>'`` by
    ``repr`` (it may be an API key)."""
    replaced = {name.lower() for name in extra}
    merged = {name: value for name, value in base.items() if name.lower() not in replaced}
    merged.update((name, Secret(value)) for name, value in extra.items())
    return merged


class Secret(str):
    """A credential as text: sent as it is, shown as ``'<redacted>'`` by ``repr``.

    Headers live in dicts that tracebacks print with ``capture_locals=True`` and
    that debuggers and loggers ``repr``; the value itself still goes on the wire.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


async def _read_body(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """Read the body, or return None if it is larger than ``limit`` (unread)."""
    length = response.content_length
    if length is not None:
        if length > limit:
            return None
        # Content-Length counts the compressed bytes: a small gzip body can
        # inflate to gigabytes, so only a plain one is read in one go.
        if "Content-Encoding" not in response.headers:
            return await response.read()
    first = await response.content.read(65536)
    if len(first) > limit:
        return None
    if response.content.at_eof():
        return first  # the whole body in one read (the usual case): no copy into a buffer
    chunks = bytearray(first)
    while chunk := await response.content.read(65536):
        chunks += chunk
        if len(chunks) > limit:
            return None
    return bytes(chunks)


#: Which answer headers results and errors keep (documented on ``SendResult.headers``;
#: keep the two in step): ids a service's support asks for, and its rate-limit advice.
_KEPT_PREFIXES = ("x-ratelimit-", "x-rate-limit-", "ratelimit", "retry-after")
_KEPT_SUFFIXES = ("request-id", "requestid", "correlation-id", "trace-id")
_KEPT_NAMES = frozenset({"cf-ray"})
#: At most this many distinct headers kept: an answer cannot grow a result without bound.
_MAX_KEPT = 32


def kept_headers(headers: Mapping[str, str]) -> ResponseHeaders:
    """The headers of an answer that results and errors carry, as a read-only copy.

    Request and correlation ids and rate-limit advice (see ``SendResult.headers``);
    a repeated header's values are joined with ``", "``. Total: any names and
    values are accepted, at most 32 distinct headers kept.
    """
    # Most answers have none of them: a pass over the names alone settles that
    # (about a third cheaper than reading every value as well).
    for name in headers.keys():  # noqa: SIM118 - the names only, not a copy of each value
        if _kept(name):
            break
    else:
        return NO_HEADERS
    kept: dict[str, str] = {}
    for name, value in headers.items():
        if not _kept(name):
            continue
        lower = name.lower()
        if lower in kept:
            kept[lower] = f"{kept[lower]}, {value}"
        elif len(kept) < _MAX_KEPT:
            kept[lower] = value
    return ResponseHeaders(kept)


# A server sends the same few header names in every answer: deciding each name once
# (a bounded cache, as the names are the server's text) halves kept_headers' time.
@functools.lru_cache(maxsize=256)
def _kept(name: str) -> bool:
    lower = name.lower()
    return (
        lower.startswith(_KEPT_PREFIXES) or lower.endswith(_KEPT_SUFFIXES) or lower in _KEPT_NAMES
    )


async def read_answer(
    response: aiohttp.ClientResponse, rules: AnswerRules, started: float
) -> SendResult:
    """What an answer means: a SUCCESS result, or the error the status table names.

    The result, or the ``APIStatusError`` / ``InvalidResponseError``, carries the
    HTTP status, the kept headers (``kept_headers``) and the seconds since
    ``started`` (a ``time.perf_counter()`` reading taken before the request).
    """
    status = response.status
    if 200 <= status < 300:
        try:
            length = response.content_length
            if (
                length is not None
                and length <= rules.max_response_bytes
                and "Content-Encoding" not in response.headers
            ):
                # The usual answer, read as _read_body would, without its coroutine.
                body: bytes | None = await response.read()
            else:
                body = await _read_body(response, rules.max_response_bytes)
        except (aiohttp.ClientError, TimeoutError) as exc:
            _scrub(exc)
            raise ResponseLostError(
                f"HTTP {status} but the body was cut off ({exc.__class__.__name__}); "
                "the message may or may not have been delivered",
            ) from exc
        elapsed = time.perf_counter() - started
        headers = kept_headers(response.headers)
        if body is None:
            raise InvalidResponseError(
                f"HTTP {status} with a body over {rules.max_response_bytes} bytes; "
                "not read. The message may or may not have been delivered",
                status=status,
                body_excerpt="",
                problems=("body too large",),
                headers=headers,
                elapsed=elapsed,
            )
        try:
            try:
                result = _wire.decode_response(body, status, elapsed, headers)
            except _wire.WireFormatError:
                # Only a body that failed pays for this: JSON is UTF-8, but a server
                # may write its answer in the charset its Content-Type names.
                recoded = _in_utf8(body, response)
                if recoded is None:
                    raise
                result = _wire.decode_response(recoded, status, elapsed, headers)
        except _wire.WireFormatError as exc:
            raise InvalidResponseError(
                f"HTTP {status} but the body is not the documented JSON "
                f"({'; '.join(exc.problems)}); the message may or may not have been delivered",
                status=status,
                body_excerpt=excerpt(body),
                problems=exc.problems,
                headers=headers,
                elapsed=elapsed,
            ) from exc
        if result.status is Status.SUCCESS:
            return result
        raise SendFailedError(result, transient=rules.classify(result))

    try:
        body = await _read_body(response, rules.max_response_bytes)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    elapsed = time.perf_counter() - started
    headers = kept_headers(response.headers)
    text = excerpt(body) if body is not None else "[body too large, not read]"
    rule = status_rule(status, rules.not_processed)
    if rule is StatusRule.AUTH:
        raise AuthenticationError(
            f"HTTP {status}: the service refused the credentials; "
            "check the username, the password and their rights",
            status=status,
            body_excerpt=text,
            headers=headers,
            elapsed=elapsed,
        )
    if rule is StatusRule.AMBIGUOUS:
        if 500 <= status < 600:
            raise ServerError(
                f"HTTP {status}: the service failed while handling the request; "
                "the message may or may not have been delivered",
                status=status,
                body_excerpt=text,
                headers=headers,
                elapsed=elapsed,
            )
        raise UnexpectedStatusError(
            f"HTTP {status}: an answer that does not say whether the message was "
            "processed; it may or may not have been delivered",
            status=status,
            body_excerpt=text,
            headers=headers,
            elapsed=elapsed,
        )
    if rule is StatusRule.REDIRECT:
        raise APIStatusError(
            f"HTTP {status}: redirect to {response.headers.get('Location', '?')!r} not "
            "followed, so credentials stay with this host; check base_url",
            status=status,
            body_excerpt=text,
            headers=headers,
            elapsed=elapsed,
        )
    if rule is StatusRule.REJECTED:
        raise APIStatusError(
            f"HTTP {status}: the service refused the request; check the request and base_url",
            status=status,
            body_excerpt=text,
            headers=headers,
            elapsed=elapsed,
        )
    # Not processed, worth retrying: 429, 408, 425, 503, or a status the policy names.
    retry_after = parse_retry_after(
        response.headers.get("Retry-After"), response.headers.get("retry-after-ms")
    )
    if rule is StatusRule.RATE_LIMITED or retry_after is not None:
        when = f"after {retry_after:.1f} s" if retry_after is not None else "later"
        raise RateLimitedError(
            f"HTTP {status}: the service asks to slow down; try again {when}",
            status=status,
            retry_after=retry_after,
            body_excerpt=text,
            headers=headers,
            elapsed=elapsed,
        )
    raise APIStatusError(
        f"HTTP {status}: the service did not process the request; try again later",
        status=status,
        body_excerpt=text,
        retryable=True,
        headers=headers,
        elapsed=elapsed,
    )


def _in_utf8(body: bytes, response: aiohttp.ClientResponse) -> bytes | None:
    """``body`` as UTF-8, from the charset its Content-Type names if that is another one.

    None when no other charset is named, or it is unknown, or the body is not in it.
    """
    try:
        charset = response.charset
        if not charset or codecs.lookup(charset).name == "utf-8":
            return None
        return body.decode(charset).encode()
    except (LookupError, ValueError):  # an unknown charset; UnicodeError is a ValueError
        return None


def parse_retry_after(
    retry_after: str | None, retry_after_ms: str | None, *, now: datetime | None = None
) -> float | None:
    """Read a wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date).

    Total over any header text: a value that cannot be read, or is not finite
    (``inf``, ``1e400``, ``nan``, a date whose zone or year is out of range),
    counts as absent. A large finite value is kept: ``max_retry_after`` decides.

    Returns:
        Seconds to wait (finite, never negative), or None when absent or unreadable.
    """
    if retry_after_ms:
        try:
            seconds = float(retry_after_ms) / 1000.0
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return max(0.0, seconds)
    if not retry_after:
        return None
    value = retry_after.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - (now or datetime.now(UTC))).total_seconds()
        except (TypeError, ValueError, OverflowError):
            # OverflowError: a zone like +99999999999999999999, or a date so far
            # out that comparing it with now leaves datetime's range.
            return None
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
