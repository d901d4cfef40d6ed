"""Every error the SDK raises, in one tree.

::

    BotMessageError
    ├── InvalidRequestError ........ bad input, raised before any I/O (also a ValueError)
    │   └── IdempotencyConflictError  an idempotency key reused for a different message
    ├── ClientClosedError .......... the client was closed (also a RuntimeError)
    ├── WrongEventLoopError ........ the client was used from a second event loop
    │                                (also a RuntimeError)
    ├── SendFailedError ............ HTTP 200 with "status": "FAILURE"
    ├── APIStatusError ............. any other non-2xx answer
    │   ├── AuthenticationError .... 401 / 403
    │   ├── RateLimitedError ....... 429 (or 408/425/503 with a Retry-After)
    │   ├── ServerError ............ 500, 502, 504 and every 5xx but 501/503/505:
    │   │                            also a DeliveryUnknownError
    │   └── UnexpectedStatusError .. 303, other 3xx but 301/302/307/308, a 1xx as
    │                                final status, anything outside 100-599:
    │                                also a DeliveryUnknownError
    ├── CoordinationError .......... a shared limiter or send guard (Redis) failed:
    │                                nothing was sent
    ├── TransportError ............. no answer: refused, DNS, timeouts, disconnects
    │   ├── CertificateError ....... TLS verification failed; not retried
    │   └── ResponseLostError ...... the request went out, the answer never came back:
    │                                also a DeliveryUnknownError
    ├── DeliveryUnknownError ....... the message may or may not have been delivered
    │   ├── InvalidResponseError ... a 2xx whose body is not the documented JSON
    │   ├── ServerError
    │   ├── UnexpectedStatusError
    │   └── ResponseLostError
    ├── BatchStoppedError .......... why a batch stopped early (BatchReport.stopped_by)
    └── BatchFailedError ........... BatchReport.raise_for_failures()

Each error carries the department and user it concerns (``None`` where it is not
about one message), how many HTTP attempts were made, and chains its cause.
Credentials never appear in a message or in ``args``. Every error pickles and
copies with its fields (a process pool hands them back whole); the chained
cause, as always in Python, does not travel.

Which of these mean "certainly not delivered" and which "unknown" is decided
in one place, ``_delivery``, not by the classes' names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._models import NO_HEADERS

if TYPE_CHECKING:
    from ._models import SendResult

__all__ = [
    "APIStatusError",
    "AuthenticationError",
    "BatchFailedError",
    "BatchStoppedError",
    "BotMessageError",
    "CertificateError",
    "ClientClosedError",
    "CoordinationError",
    "DeliveryUnknownError",
    "IdempotencyConflictError",
    "InvalidRequestError",
    "InvalidResponseError",
    "NotAttemptedError",
    "RateLimitedError",
    "ResponseLostError",
    "SendFailedError",
    "ServerError",
    "TransportError",
    "UnexpectedStatusError",
    "WrongEventLoopError",
]

#: How much of a bad answer's body an error keeps, in characters.
EXCERPT_LIMIT = 500


def excerpt(body: bytes | str, limit: int = EXCERPT_LIMIT) -> str:
    """Return at most ``limit`` characters of ``body``, marked when cut."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def _restore(cls: type[BotMessageError], args: tuple[object, ...]) -> BotMessageError:
    """Rebuild an error for ``pickle`` and ``copy``; its fields follow as state."""
    error = cls.__new__(cls)
    error.args = args
    return error


class BotMessageError(Exception):
    """Base of every error raised by botmsg-async.

    Attributes:
        department_uuid: The department of the message concerned, if any.
        user_uuid: The user of the message concerned, if any.
        attempts: HTTP attempts made for the message (0 when none was made).
    """

    def __init__(
        self,
        message: str,
        *,
        department_uuid: str | None = None,
        user_uuid: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.department_uuid = department_uuid
        self.user_uuid = user_uuid
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        # Most subclasses take keyword-only fields, which BaseException's own
        # reduce (``cls(*args)``) cannot rebuild: restore the instance bare, then
        # its fields from ``__dict__``.
        return (_restore, (type(self), self.args), self.__dict__)

    def __str__(self) -> str:
        if self.department_uuid is None and self.user_uuid is None:
            return self.message
        return f"{self.message} (department={self.department_uuid}, user={self.user_uuid})"


class InvalidRequestError(BotMessageError, ValueError):
    """Bad input, found before any I/O: nothing was sent.

    Attributes:
        field: The argument or field at fault (e.g. ``"user_uuid"``, ``"message.body"``).
        value: The offending value (never a credential).
    """

    def __init__(
        self,
        field: str,
        value: object,
        problem: str,
        *,
        department_uuid: str | None = None,
        user_uuid: str | None = None,
    ) -> None:
        super().__init__(
            f"invalid {field} {value!r}: {problem}; nothing was sent",
            department_uuid=department_uuid,
            user_uuid=user_uuid,
        )
        self.field = field
        self.value = value
        self.problem = problem


class IdempotencyConflictError(InvalidRequestError):
    """An idempotency key already used for a different message: nothing was sent.

    A send guard (``BotMessageClient(send_guard=...)``) remembers which message
    (department, user, text) each key was first used for; the same key with
    another message is a bug in the caller's key scheme, and sending would
    either be deduplicated away by the service or deliver the wrong message.
    """


class CoordinationError(BotMessageError):
    """A limiter or send guard shared across processes (e.g. on Redis) failed.

    Raised before any attempt: the message was **not sent**, so the item is
    FAILED and may be sent again once the shared store is back (the limiter's
    ``fail_open=True`` trades this for a per-process limit instead).
    """


class NotAttemptedError(BotMessageError):
    """A ``Sender`` chose not to attempt this item: nothing was sent.

    Raised before any I/O by a sender that decides per item (e.g. a job's run,
    for an item another run started, or once the job is stopping). The item is
    FAILED (certainly not delivered) but, like bad input, it says nothing about
    the service or the configuration: it does not count toward a batch's
    consecutive-failure circuit breaker, and does not stop the batch.
    """


class ClientClosedError(BotMessageError, RuntimeError):
    """The client was closed; create a new ``BotMessageClient``."""


class WrongEventLoopError(BotMessageError, RuntimeError):
    """The client was used from an event loop other than the one that first used it.

    Or it was lent (``session=``) an ``aiohttp.ClientSession`` made on another loop.
    Its connection pool lives on that first loop (which may be closed by now,
    as at the end of an ``asyncio.run``): nothing was sent. Create one client
    per event loop, inside the coroutine that ``asyncio.run`` runs.
    """


class SendFailedError(BotMessageError):
    """The service answered HTTP 200 with ``"status": "FAILURE"``.

    Attributes:
        result: The parsed answer, with its ``errors`` and ``warnings``.
        transient: Whether the failure was judged transient (worth retrying later).
    """

    def __init__(
        self,
        result: SendResult,
        *,
        transient: bool,
        department_uuid: str | None = None,
        user_uuid: str | None = None,
        attempts: int = 0,
    ) -> None:
        reasons = "; ".join(
            f"{e.code or '?'}: {e.description or ''}".strip() for e in result.errors
        )
        advice = (
            "the service reports a temporary problem; retry later"
            if transient
            else "the service rejected the message; fix the request before sending it again"
        )
        super().__init__(
            f"send failed ({reasons or 'the service gave no reason'}): {advice}",
            department_uuid=department_uuid,
            user_uuid=user_uuid,
            attempts=attempts,
        )
        self.result = result
        self.transient = transient


class APIStatusError(BotMessageError):
    """The service answered with a non-2xx HTTP status.

    Attributes:
        status: The HTTP status code (also as ``http_status``, as on ``SendResult``).
        body_excerpt: At most 500 characters of the answer's body.
        retryable: The status proves the message was not processed and is worth
            sending again (408, 425, 503, or a status the policy names).
        headers: The answer's headers that matter (ids, rate limits, Retry-After),
            read-only; the same selection as ``SendResult.headers``. Empty for an
            error not read from an answer.
        elapsed: Seconds the attempt that got this answer took (None when not
            read from an answer).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        body_excerpt: str = "",
        retryable: bool = False,
        headers: Mapping[str, str] = NO_HEADERS,
        elapsed: float | None = None,
        department_uuid: str | None = None,
        user_uuid: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(
            message, department_uuid=department_uuid, user_uuid=user_uuid, attempts=attempts
        )
        self.status = status
        self.body_excerpt = body_excerpt
        self.retryable = retryable
        self.headers = headers
        self.elapsed = elapsed

    @property
    def http_status(self) -> int:
        """The HTTP status code (``status``), named as on ``SendResult``."""
        return self.status


class AuthenticationError(APIStatusError):
    """HTTP 401 or 403: check the username, the password and their rights."""


class RateLimitedError(APIStatusError):
    """HTTP 429 (or 503): the service asks to slow down.

    Attributes:
        retry_after: Seconds the service asked to wait, if it said so.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        retry_after: float | None,
        body_excerpt: str = "",
        headers: Mapping[str, str] = NO_HEADERS,
        elapsed: float | None = None,
        department_uuid: str | None = None,
        user_uuid: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(
            message,
            status=status,
            body_excerpt=body_excerpt,
            retryable=True,
            headers=headers,
            elapsed=elapsed,
            department_uuid=department_uuid,
            user_uuid=user_uuid,
            attempts=attempts,
        )
        self.retry_after = retry_after


#: What to do next, at the end of every ``DeliveryUnknownError``'s message.
UNKNOWN_HINT = (
    "check with the recipient before sending it again (a resend is safe only under the "
    "same idempotency key, and only if the service deduplicates by it)"
)


class DeliveryUnknownError(BotMessageError):
    """The request may have reached the service, but no usable answer came back.

    The message may or may not have been delivered. Sending it again risks a
    duplicate; check with the recipient or the service before doing so, or use
    ``RetryPolicy(retry_ambiguous=True)`` with a server that deduplicates by
    idempotency key. The message ends with that advice, whichever subclass
    (and whichever place in the SDK) built it.

    Attributes:
        idempotency_key: The key every attempt carried, to ask the service about it.
        final_error: With ``retry_ambiguous``, a definite failure that a later
            attempt met (e.g. an ``AuthenticationError`` after a 500): delivery
            stays unknown, but that error decides what happens next (a batch
            stops on refused credentials).
    """

    idempotency_key: str | None = None
    final_error: BotMessageError | None = None

    def __init__(
        self,
        message: str,
        *,
        department_uuid: str | None = None,
        user_uuid: str | None = None,
        attempts: int = 0,
    ) -> None:
        # Every subclass's __init__ reaches this one (it is next in each MRO), so
        # no place that builds one can leave the advice out.
        super().__init__(
            f"{message}; {UNKNOWN_HINT}",
            department_uuid=department_uuid,
            user_uuid=user_uuid,
            attempts=attempts,
        )


class TransportError(BotMessageError):
    """No HTTP answer: connection refused, DNS or TLS failure, timeout, disconnect."""


class CertificateError(TransportError):
    """TLS verification failed: the server's certificate is not trusted; not retried.

    Nothing was sent. The message says why (expired, self-signed, wrong host...):
    fix the server's certificate, or the trust store the client's session uses.
    The same certificate would fail the same way, so it is not retried.
    """


class ResponseLostError(TransportError, DeliveryUnknownError):
    """The request was sent but the answer was lost (read timeout, reset, disconnect)."""


class ServerError(APIStatusError, DeliveryUnknownError):
    """A 5xx (but 501, 503, 505): the service failed while it may have processed the message.

    500, 502 and 504, and the proxies' 520-527, 598 and 599 among them.
    """


class UnexpectedStatusError(APIStatusError, DeliveryUnknownError):
    """A status that does not say whether the message was processed.

    303 (the usual answer to a processed POST), other 3xx but the redirects
    301/302/307/308, a 1xx as final status, or a number outside 100-599.
    """


class InvalidResponseError(DeliveryUnknownError):
    """A 2xx answer whose body is not the documented JSON.

    Attributes:
        status: The HTTP status code (also as ``http_status``).
        body_excerpt: At most 500 characters of the body.
        problems: What was wrong with it, one line per problem.
        headers: The answer's headers that matter, as on ``APIStatusError``.
        elapsed: Seconds the attempt took, as on ``APIStatusError``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        body_excerpt: str,
        problems: tuple[str, ...] = (),
        headers: Mapping[str, str] = NO_HEADERS,
        elapsed: float | None = None,
        department_uuid: str | None = None,
        user_uuid: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(
            message, department_uuid=department_uuid, user_uuid=user_uuid, attempts=attempts
        )
        self.status = status
        self.body_excerpt = body_excerpt
        self.problems = problems
        self.headers = headers
        self.elapsed = elapsed

    @property
    def http_status(self) -> int:
        """The HTTP status code (``status``), named as on ``SendResult``."""
        return self.status


class BatchStoppedError(BotMessageError):
    """Why a batch stopped early without one item's error to show for it.

    Found in ``BatchReport.stopped_by``; the items not started are SKIPPED.

    Attributes:
        reason: ``"consecutive_failures"`` (the circuit breaker) or
            ``"pause_too_long"`` (a 429 asked to wait past ``max_pause``).
        last_error: The item error that tripped it, if any.
    """

    def __init__(self, message: str, *, reason: str, last_error: BotMessageError | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.last_error = last_error


class BatchFailedError(BotMessageError):
    """Raised by ``BatchReport.raise_for_failures()`` when not every item was sent.

    Attributes:
        failed: Items that failed for good.
        unknown: Items whose delivery is unknown.
        skipped: Items never attempted.
    """

    def __init__(self, *, failed: int, unknown: int, skipped: int) -> None:
        super().__init__(
            f"batch incomplete: {failed} failed, {unknown} unknown, {skipped} skipped; "
            "see BatchReport.results for each item"
        )
        self.failed = failed
        self.unknown = unknown
        self.skipped = skipped
