"""The delivery rules: every "was it delivered, may it go again?" question, in one place.

Pure functions over the error tree and HTTP status codes: no I/O, no aiohttp.
The retry engine, the batch, the journal and the command line ask these
functions and never re-derive the answers, so that a new error type or status
is classified once. The README's "What each answer means" table is this module.

The HTTP status table (``status_rule``):

=============================================  ==============  ===================================
Status                                         Processed?      What the SDK does
=============================================  ==============  ===================================
401, 403                                       no              final; stops a batch
429                                            no              retried (Retry-After), pauses client
408, 425, 503                                  no              retried (Retry-After honoured)
301, 302, 307, 308                             no              not followed; final; stops a batch
other 4xx, 501, 505                            no              final (the same request would fail)
``RetryPolicy.not_processed_statuses``         no              retried (the service documents it)
500, 502, 504, 303, other 3xx and 5xx, 1xx,    maybe           ``DeliveryUnknownError``: retried
anything outside 100-599                                       only with ``retry_ambiguous``
=============================================  ==============  ===================================

A 2xx is not in the table: its body decides (SUCCESS, FAILURE, or an
unreadable answer, which is ambiguous).
"""

from __future__ import annotations

import enum
from typing import Final

from ._errors import (
    APIStatusError,
    AuthenticationError,
    BotMessageError,
    CertificateError,
    ClientClosedError,
    CoordinationError,
    DeliveryUnknownError,
    InvalidRequestError,
    NotAttemptedError,
    RateLimitedError,
    SendFailedError,
    TransportError,
    WrongEventLoopError,
)
from ._models import Outcome

__all__ = [
    "StatusRule",
    "is_retryable",
    "may_resend",
    "outcome_of",
    "releases_claim",
    "settles_doubt",
    "status_rule",
    "stops_batch",
    "trips_breaker",
    "unexpected_error",
]


class StatusRule(enum.Enum):
    """What a non-2xx HTTP status says about the message, and what to do next."""

    #: 401/403: not processed; the credentials were refused. Final; stops a batch.
    AUTH = "auth"
    #: 429: not processed; retried after the wait the service names.
    RATE_LIMITED = "rate_limited"
    #: 408, 425, 503 and statuses the policy names: not processed, worth retrying.
    RETRY_LATER = "retry_later"
    #: 301/302/307/308: not processed, not followed (credentials stay with the host).
    REDIRECT = "redirect"
    #: Any other 4xx, 501, 505: not processed; the same request would be refused again.
    REJECTED = "rejected"
    #: Everything else: the service may have processed the message.
    AMBIGUOUS = "ambiguous"


_RULES: Final = {
    401: StatusRule.AUTH,
    403: StatusRule.AUTH,
    429: StatusRule.RATE_LIMITED,
    408: StatusRule.RETRY_LATER,
    425: StatusRule.RETRY_LATER,
    503: StatusRule.RETRY_LATER,
    301: StatusRule.REDIRECT,
    302: StatusRule.REDIRECT,
    307: StatusRule.REDIRECT,
    308: StatusRule.REDIRECT,
    501: StatusRule.REJECTED,
    505: StatusRule.REJECTED,
}


def status_rule(status: int, not_processed: frozenset[int] = frozenset()) -> StatusRule:
    """Classify a non-2xx HTTP status by what it proves about delivery.

    Args:
        status: The status of the final answer (any integer the peer sent).
        not_processed: Extra statuses the service documents as "not processed,
            try again" (``RetryPolicy.not_processed_statuses``).

    Returns:
        The rule for that status; ``AMBIGUOUS`` unless the status proves the
        message was not processed. 303 ("see other", the classic answer to a
        processed POST) and every 5xx not named above are ambiguous.
    """
    rule = _RULES.get(status)
    if rule is not None:
        return rule
    if status in not_processed:
        return StatusRule.RETRY_LATER
    if 400 <= status < 500:
        return StatusRule.REJECTED
    return StatusRule.AMBIGUOUS


def _definite(error: BotMessageError) -> BotMessageError:
    """The error that decides: an unknown delivery's later definite failure, if any."""
    if isinstance(error, DeliveryUnknownError) and error.final_error is not None:
        return error.final_error
    return error


def is_retryable(error: BotMessageError, *, retry_ambiguous: bool) -> bool:
    """Whether another attempt of the same send (same key) may be made now.

    Args:
        error: What the last attempt raised.
        retry_ambiguous: The policy allows retrying when delivery is unknown
            (safe only with a service that deduplicates by idempotency key).
    """
    if isinstance(error, DeliveryUnknownError):
        return retry_ambiguous
    if isinstance(error, SendFailedError):
        return error.transient
    if isinstance(error, CertificateError | ClientClosedError | WrongEventLoopError):
        return False
    if isinstance(error, TransportError | RateLimitedError):
        return True
    if isinstance(error, APIStatusError):
        return error.retryable
    return False


def outcome_of(error: BotMessageError | None, attempts: int) -> Outcome:
    """The outcome of a send that ended with ``error`` after ``attempts`` HTTP attempts.

    SENT when there is no error; UNKNOWN when the message may have been
    delivered; SKIPPED when the client was closed (or used from a second event
    loop) before any attempt; FAILED otherwise (certainly not delivered).
    """
    if error is None:
        return Outcome.SENT
    if isinstance(error, DeliveryUnknownError):
        return Outcome.UNKNOWN
    if isinstance(error, ClientClosedError | WrongEventLoopError) and attempts == 0:
        return Outcome.SKIPPED
    return Outcome.FAILED


def unexpected_error(exc: Exception) -> DeliveryUnknownError:
    """What a send that raised ``exc``, not a ``BotMessageError``, says of its message.

    A defect (of a custom sender, or a warning raised as an error) may come at
    any point of a send, after its request reached the service too: the message
    may have been delivered, so it is unknown, never resent under a new key.
    """
    unknown = DeliveryUnknownError(
        f"the send failed with an unexpected error ({type(exc).__name__}: {exc}); "
        "the message may have been delivered"
    )
    unknown.__cause__ = exc
    return unknown


def may_resend(error: BotMessageError | None) -> bool:
    """Whether a FAILED item may be sent again by a later run, under a new key.

    Only when the message certainly was not delivered and the same request may
    get through later: throttling, a transient FAILURE, no connection, a
    closed client, refused credentials (fixed by the user), a status that
    proves it was not processed and is worth retrying, a client used from a
    second event loop (nothing was sent; the program is at fault, not the
    message). A final FAILURE or a 4xx that says the request itself is wrong
    would only fail again.
    """
    if error is None or isinstance(error, DeliveryUnknownError):
        return False
    if isinstance(error, SendFailedError):
        return error.transient
    if isinstance(error, AuthenticationError | RateLimitedError | ClientClosedError):
        return True
    if isinstance(error, CoordinationError | NotAttemptedError):
        return True  # raised before any attempt: nothing was sent
    if isinstance(error, WrongEventLoopError):
        return True
    if isinstance(error, CertificateError):
        return True  # nothing was sent; a fixed trust store lets it through
    if isinstance(error, TransportError):
        return True
    if isinstance(error, APIStatusError):
        return error.retryable
    return False


def releases_claim(error: BotMessageError) -> bool:
    """Whether a send guard frees an idempotency key after its send ended with ``error``.

    Freed (a later send of the same key, e.g. a job queue's redelivery, may try
    again) only when the message certainly was not delivered and the same
    request may get through later: ``may_resend``. Anything else is recorded
    under the key: a final failure is raised again to the next sender, and an
    unknown delivery stays unknown (never sent twice).
    """
    return may_resend(error)


def settles_doubt(outcome: Outcome, error: BotMessageError | None) -> bool:
    """Whether a resend (same key) of an item in doubt proves what became of it.

    SENT does (a deduplicating service answers the earlier delivery), and so
    does a final FAILURE (the service processed the message and refused it, as
    it would have the first time). Anything else proves nothing about the
    earlier attempt: the item stays in doubt.
    """
    if outcome is Outcome.SENT:
        return True
    return isinstance(error, SendFailedError) and not error.transient


#: Errors raised before any I/O that say nothing about the service or the
#: configuration: bad input, and an item its sender chose not to attempt.
_NOT_EVIDENCE: Final = (InvalidRequestError, NotAttemptedError)


def trips_breaker(outcome: Outcome, error: BotMessageError | None) -> bool:
    """Whether an item counts toward a batch's "N failures in a row" circuit breaker.

    FAILED and UNKNOWN items do, as signs that the service or the configuration
    is broken; an item refused before any I/O (``InvalidRequestError``) or not
    attempted by its sender's choice (``NotAttemptedError``) says nothing about
    either and does not count.
    """
    if outcome is not Outcome.FAILED and outcome is not Outcome.UNKNOWN:
        return False
    return not isinstance(error, _NOT_EVIDENCE)


def stops_batch(error: BotMessageError) -> bool:
    """Whether ``error`` on one item must stop a whole batch (the rest SKIPPED).

    Refused credentials (going on risks a lockout), a redirect (``base_url`` is
    wrong for every item), a closed client and a client used from a second event
    loop stop it; so does any of these when it came after an attempt whose
    delivery is unknown.
    """
    error = _definite(error)
    if isinstance(error, AuthenticationError | ClientClosedError | WrongEventLoopError):
        return True
    return isinstance(error, APIStatusError) and status_rule(error.status) is StatusRule.REDIRECT
